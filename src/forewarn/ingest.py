"""Ingest: what each kind of client sends, turned into Segment-spec messages.

The HTTP server authenticates a request, decompresses its body and hands the bytes to one function:
`segment`, `posthog` or `sentry_envelope` here, `tickets` or `stripe` in `webhooks` (ticket and
billing webhooks, built on the same machinery). Each returns a `Parsed`: the
accepted messages (Segment-spec dicts, the form the event log stores, each with `messageId`,
`timestamp` after clock-skew correction and `receivedAt`), the normalised `Event` of each, and
the items it rejected with the reason. One bad item never sinks its batch; a body that cannot be
used as a whole raises `InputError` (400), one over a size limit `TooLargeError` (413), a webhook
whose signature does not verify `SignatureError`.

Pure: no clock (time comes in as `received_ms` / `now_ms`), no disk, no network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from forewarn.errors import EventError, InputError, TooLargeError
from forewarn.model import MAX_TIME_MS, Event, SegmentMessage, from_message, parse_time_ms
from forewarn.records import PostHogBody, SegmentBatch

# An item of a body as sent: bytes, or the msgspec.Raw a body's list decodes to. Raw's stubs
# call it a bytes, which it is not at run time: with that type, the compiled build would
# refuse it.
Item = Any

MAX_EVENT_BYTES = 32 * 1024  # one message, as sent
MAX_BATCH_BYTES = 500 * 1024  # one request body, after decompression
MAX_BATCH_EVENTS = 2_500  # messages (or envelope items) in one request
# Sentry caps one error event at 1 MiB; a single large error must not be refused, and only a few
# fields of it are kept, so envelopes get Sentry's limit rather than the batch limit.
MAX_ENVELOPE_BYTES = 1024 * 1024
FUTURE_MS = 23 * 3600 * 1000  # events stamped further ahead of their receipt are flagged
MAX_TEXT = 1_000  # characters kept of a text field taken from an error or a ticket

SEGMENT_ROUTES = ("batch", "track", "identify", "group", "page", "screen", "alias")
ACCOUNT_KEY = "account_id"  # the Sentry tag or user field (or webhook field) naming the account


@dataclass(frozen=True, slots=True)
class Rejection:
    """Item `index` of the request (counted from 0) was not accepted, and why."""

    index: int
    reason: str
    message_id: str | None = None


@dataclass(slots=True)
class Parsed:
    """What one request body yielded. `events[i]` is `messages[i]` normalised; `flagged` holds
    positions in `messages` of events stamped more than 23 h after their receipt; `ignored`
    counts items that carry nothing Forewarn reads (Sentry sessions, other webhook types)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    ignored: int = 0
    write_key: str | None = None
    positions: list[int] = field(default_factory=list)  # each message's index in the request

    def position(self, i: int) -> int:
        """The index in the request of `messages[i]`."""
        return self.positions[i] if len(self.positions) == len(self.messages) else i


# --- time ---------------------------------------------------------------------------------------


def correct_skew(timestamp_ms: int | None, sent_at_ms: int | None, received_ms: int) -> int:
    """When the event happened, on the server's clock. A client stamps both the event and the
    moment it sent it with its own clock; the difference is how long ago the event happened,
    whatever that clock's error: `received - (sent_at - timestamp)`. Without `sent_at` the
    client's timestamp is used as it is; without a timestamp, the moment of receipt."""
    if timestamp_ms is None:
        return received_ms
    if sent_at_ms is None:
        return timestamp_ms
    return received_ms - (sent_at_ms - timestamp_ms)


_EPOCH = datetime(1970, 1, 1)


@lru_cache(maxsize=256)
def _minute(minutes: int) -> str:
    return (_EPOCH + timedelta(minutes=minutes)).isoformat(timespec="minutes")


_SECONDS = tuple(f":{s:02d}." for s in range(60))
_MILLIS = tuple(f"{m:03d}Z" for m in range(1000))


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, to the millisecond. The events of one
    request mostly share their minute, so its text is computed once; the rest is looked up
    (formatting two numbers costs more than the whole lookup)."""
    minutes, rest = divmod(ms, 60_000)
    seconds, milli = divmod(rest, 1000)
    return _minute(minutes) + _SECONDS[seconds] + _MILLIS[milli]


def _time_ms(value: object, name: str) -> int:
    """A client time: ISO 8601 text or integer milliseconds; EventError otherwise."""
    if type(value) is str or type(value) is int:
        try:
            return parse_time_ms(value)
        except (ValueError, OverflowError):
            pass
    raise EventError(
        f"{name} {value!r} is not ISO 8601 (e.g. 2026-11-23T10:00:00Z) "
        "nor milliseconds since the epoch, between 1970 and 9999"
    )


def _sent_ms(value: object, name: str) -> int | None:
    """A request-level send time; a bad one makes the whole body unusable."""
    if value is None:
        return None
    if type(value) is float and value.is_integer():  # JSON does not tell 5.0 from 5
        value = int(value)
    try:
        return _time_ms(value, name)
    except EventError as exc:
        raise InputError(exc.message) from None


# --- accepting one message ----------------------------------------------------------------------


def _text(value: object) -> str | None:
    """An id or a short text: str or int (not bool), non-empty; else None."""
    if type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    return None


def _clip(value: object) -> str | None:
    text = _text(value)
    return text[:MAX_TEXT] if text is not None else None


def _dict(value: object) -> dict[str, Any]:
    return value if type(value) is dict else {}


def _fallback_id(raw: Item | None, msg: dict[str, Any]) -> str:
    """A message id for a client that sent none: a hash of the item as sent, so a retried
    request is still deduplicated."""
    if raw is None:
        raw = msgspec.json.encode(msg, order="deterministic")
    return "fw-" + hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()


def _accept(
    out: Parsed,
    msg: dict[str, Any],
    client_ms: int | None,
    sent_ms: int | None,
    received_ms: int,
    received_at: str,
    raw: Item | None = None,
    sent_at: str | None = None,
) -> None:
    """Validate a Segment message, correct its time, complete it and add it to `out`; raises
    EventError with the reason instead. `raw` is the item as sent (for a missing message id),
    `sent_at` the text of `sent_ms` when the caller has it."""
    when = correct_skew(client_ms, sent_ms, received_ms)
    if not 0 <= when < MAX_TIME_MS:
        if client_ms is None or sent_ms is None:
            raise EventError(f"timestamp {when} ms is outside 1970..9999: send when it happened")
        raise EventError(  # both were parsed, so both are within 1970..9999
            f"timestamp {iso(client_ms)} sent at {iso(sent_ms)} "
            "puts the event outside 1970..9999 after clock-skew correction: "
            "send 'sentAt' as the moment the request was sent, on the same clock"
        )
    try:
        typed = msgspec.convert(msg, SegmentMessage)
    except msgspec.ValidationError as exc:
        raise EventError(f"not a valid Segment message: {exc}") from None
    if typed.message_id is None or typed.message_id == "":
        typed.message_id = msg["messageId"] = _fallback_id(raw, msg)
    typed.timestamp = when  # already parsed: spare from_message a second parse
    typed.original_timestamp = None
    event = from_message(typed)
    for value in (event.user_id, event.anonymous_id, event.account_id, event.name):
        if value is not None and "\x00" in value:
            raise EventError(
                "an id or event name contains a NUL character (\\u0000): send text without it"
            )
    if client_ms is not None and when != client_ms and "originalTimestamp" not in msg:
        stamp = msg.get("timestamp")
        msg["originalTimestamp"] = iso(client_ms) if stamp is None else stamp
    msg["timestamp"] = iso(when)
    if sent_ms is not None and "sentAt" not in msg:
        msg["sentAt"] = sent_at if sent_at is not None else iso(sent_ms)
    msg["receivedAt"] = received_at
    if when > received_ms + FUTURE_MS:
        out.flagged.append(len(out.messages))
    out.messages.append(msg)
    out.events.append(event)


# msgspec checks UTF-8 inside strings only when it makes them, and says so with a
# UnicodeDecodeError: both mean the bytes are not JSON
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError)


def _object(raw: Item, shape: str, limit: int = MAX_EVENT_BYTES) -> dict[str, Any]:
    """One item of a batch as a dict; EventError if it is over `limit` bytes, not JSON, or
    not an object (`shape` says what to send instead)."""
    if len(raw) > limit:
        raise _too_big(raw)
    try:
        item = msgspec.json.decode(raw)
    except _NOT_JSON as exc:
        raise EventError(f"not valid JSON ({exc}): send each {shape}") from None
    if type(item) is not dict:
        raise EventError(f"not a JSON object: send each {shape}")
    return item


def _decode(body: bytes, limit: int, what: str) -> Any:
    if len(body) > limit:
        raise TooLargeError(
            f"{what} body is {len(body)} bytes, over the {limit}-byte limit: "
            "send fewer events per request"
        )
    try:
        return msgspec.json.decode(body)
    except _NOT_JSON as exc:
        raise InputError(f"{what} body is not valid JSON ({exc}): send a JSON object") from None


def _check_count(count: int, what: str) -> None:
    if count > MAX_BATCH_EVENTS:
        raise TooLargeError(
            f"{what} has {count} items, over the limit of {MAX_BATCH_EVENTS}: "
            "split it into smaller requests"
        )


def _fits(msg: dict[str, Any]) -> None:
    """A message built from a larger item (an error, a ticket) is held to the same limit."""
    size = len(msgspec.json.encode(msg))
    if size > MAX_EVENT_BYTES:
        raise EventError(
            f"the message built from it is {size} bytes, over the {MAX_EVENT_BYTES}-byte limit: "
            "send shorter ids, tags and texts"
        )


def _too_big(raw: Item) -> EventError:
    return EventError(
        f"message is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit: "
        "keep large data (logs, payloads) out of event properties"
    )


# --- Segment ------------------------------------------------------------------------------------


def segment(body: bytes, path_kind: str, received_ms: int) -> Parsed:
    """A Segment HTTP tracking API request: `path_kind` is `batch` for `/v1/batch` (and
    `/v1/import`), else the message type its route fixes (`/v1/track` is `track`, ...)."""
    if path_kind not in SEGMENT_ROUTES:
        raise ValueError(f"unknown Segment route {path_kind!r}: use one of {SEGMENT_ROUTES}")
    if len(body) > MAX_BATCH_BYTES:
        raise TooLargeError(
            f"Segment body is {len(body)} bytes, over the {MAX_BATCH_BYTES}-byte limit: "
            "send fewer events per request"
        )
    out = Parsed()
    try:
        if path_kind == "batch":
            envelope = msgspec.json.decode(body, type=SegmentBatch)
            items, context = envelope.batch, envelope.context
            _check_count(len(items), "the batch")
            out.write_key = envelope.write_key
            batch_sent = _sent_ms(envelope.sent_at, "sentAt")
        else:
            if type(msgspec.json.decode(body)) is not dict:  # not an item to reject: a 400
                raise InputError(
                    f"the body of /v1/{path_kind} is one message: send a JSON object, "
                    f'e.g. {{"userId": "u1", ...}}'
                )
            items, context, batch_sent = [msgspec.Raw(body)], None, None
    except msgspec.ValidationError as exc:
        raise InputError(
            f'not a Segment batch ({exc}): send {{"batch": [messages...], "sentAt": ...}}'
        ) from None
    except _NOT_JSON as exc:
        raise InputError(f"Segment body is not valid JSON ({exc})") from None
    received_at = iso(received_ms)
    batch_sent_at = None if batch_sent is None else iso(batch_sent)
    for index, raw in enumerate(items):
        message_id = None
        try:
            msg = _object(raw, 'message as {"type": ..., ...}')
            message_id = _text(msg.get("messageId"))
            key = msg.pop("writeKey", None)  # a secret: never stored in the event log
            if path_kind != "batch":
                msg["type"] = path_kind
                if type(key) is str:
                    out.write_key = key
            if context:
                own = msg.get("context")
                msg["context"] = {**context, **own} if type(own) is dict else dict(context)
            stamp = msg.get("timestamp")
            if stamp is None:
                stamp = msg.get("originalTimestamp")
            client_ms = None if stamp is None else _time_ms(stamp, "timestamp")
            sent = msg.get("sentAt")
            sent_ms = batch_sent if sent is None else _time_ms(sent, "sentAt")
            _accept(out, msg, client_ms, sent_ms, received_ms, received_at, raw, batch_sent_at)
            out.positions.append(index)
        except EventError as exc:
            out.rejected.append(Rejection(index, exc.message, message_id))
    return out


# --- PostHog ------------------------------------------------------------------------------------


def posthog(
    body: bytes,
    received_ms: int,
    *,
    sent_at: str | None = None,
    account_group_type: str | None = None,
) -> Parsed:
    """A PostHog capture request: `/batch/` and `/capture/` (v0: `{"api_key", "batch": [...],
    "sent_at"}`, a bare list, or one event) and `/i/v1/analytics/events` (v1: `{"created_at",
    "batch"}`, key in the `Authorization` header). For v1 pass the `PostHog-Request-Timestamp`
    header as `sent_at`: v1 bodies carry no send time. `account_group_type` picks which of an
    event's `$groups` is the account; by default the first."""
    if len(body) > MAX_BATCH_BYTES:
        raise TooLargeError(
            f"PostHog body is {len(body)} bytes, over the {MAX_BATCH_BYTES}-byte limit: "
            "send fewer events per request"
        )
    try:
        data = msgspec.json.decode(body, type=list[msgspec.Raw] | PostHogBody)
    except msgspec.ValidationError as exc:
        raise InputError(
            f'not a PostHog capture body ({exc}): send {{"api_key": ..., "batch": [events...]}}'
        ) from None
    except _NOT_JSON as exc:
        raise InputError(f"PostHog body is not valid JSON ({exc})") from None
    if isinstance(data, list):
        top, items = PostHogBody(), data
    else:
        top, items = data, data.batch if data.batch is not None else [msgspec.Raw(body)]
    _check_count(len(items), "the batch")
    out = Parsed()
    key = top.api_key if top.api_key is not None else top.token
    out.write_key = key if type(key) is str else None
    batch_sent = _sent_ms(sent_at if sent_at is not None else top.sent_at, "sent_at")
    batch_sent_at = None if batch_sent is None else iso(batch_sent)
    received_at = iso(received_ms)
    for index, raw in enumerate(items):
        message_id = None
        try:
            item = _object(raw, 'event as {"event": ..., ...}')
            message_id = _text(item.get("uuid"))
            if out.write_key is None:  # posthog-js puts the key in each event's properties
                key = item.get("api_key", _dict(item.get("properties")).get("token"))
                out.write_key = key if type(key) is str else None
            stamp = item.get("timestamp")
            offset = item.get("offset")
            sent_text = batch_sent_at
            if stamp is not None:
                client_ms: int | None = _time_ms(stamp, "timestamp")
                sent = item.get("sent_at")
                if sent is None:
                    sent_ms = batch_sent
                else:
                    sent_ms, sent_text = _time_ms(sent, "sent_at"), None
            elif type(offset) is int and offset >= 0:  # "this many ms before sending"
                client_ms, sent_ms = received_ms - offset, None
            else:
                client_ms = sent_ms = None
            msg = _posthog_message(item, account_group_type)
            if msg is None:
                out.ignored += 1
                continue
            if stamp is not None:
                msg["timestamp"] = stamp  # kept as originalTimestamp if corrected
            _accept(out, msg, client_ms, sent_ms, received_ms, received_at, raw, sent_text)
            out.positions.append(index)
        except EventError as exc:
            out.rejected.append(Rejection(index, exc.message, message_id))
    return out


def _posthog_message(item: dict[str, Any], group_type: str | None) -> dict[str, Any] | None:
    """The Segment message for one PostHog event; None for another group type's group call."""
    name = item.get("event")
    if type(name) is not str or not name:
        raise EventError("PostHog event has no 'event' name: set 'event' to what happened")
    props = _dict(item.get("properties"))  # decoded for this call: ours to change
    props.pop("token", None)  # the project key: never stored in the event log
    person = item.get("distinct_id", props.get("distinct_id", item.get("$distinct_id")))
    person = _text(person)
    if person is None:
        raise EventError("PostHog event has no 'distinct_id': set it to the user's id")
    msg: dict[str, Any] = {"userId": person}
    if "uuid" in item:
        msg["messageId"] = item["uuid"]
    groups = _dict(props.get("$groups"))
    account = _text(groups.get(group_type) if group_type else next(iter(groups.values()), None))
    if account is not None:
        msg["context"] = {"groupId": account}
    if name in ("$identify", "$set"):
        traits = item.get("$set", props.get("$set"))
        msg.update(type="identify", traits=traits if traits is not None else {})
    elif name == "$groupidentify":
        kind = props.get("$group_type")
        if group_type is not None and kind != group_type:
            return None
        key = _text(props.get("$group_key"))
        if key is None:
            raise EventError("$groupidentify has no '$group_key': set it to the account's id")
        if person == f"${kind}_{key}":  # PostHog's stand-in person for a server-side call
            msg["anonymousId"] = msg.pop("userId")
        set_ = props.get("$group_set")
        msg.update(type="group", groupId=key, traits=set_ if set_ is not None else {})
        msg.pop("context", None)
    elif name == "$create_alias":
        msg.update(type="alias", previousId=props.get("alias"))
    elif name == "$pageview":
        url = props.get("$current_url")
        path = props.get("$pathname")
        if type(path) is not str and type(url) is str:
            path = urlsplit(url).path or "/"
        if type(url) is str:
            props.setdefault("url", url)
        if type(path) is str:
            props.setdefault("path", path)
        msg.update(type="page", name=path if type(path) is str else "", properties=props)
    elif name == "$screen":
        screen = props.get("$screen_name")
        msg.update(type="screen", name=screen if type(screen) is str else "", properties=props)
    else:
        msg.update(type="track", event=name, properties=props)
    return msg


def posthog_v1_results(parsed: Parsed) -> dict[str, Any]:
    """The body a PostHog v1 capture endpoint answers: a result per event uuid."""
    results: dict[str, Any] = {str(m["messageId"]): {"result": "ok"} for m in parsed.messages}
    for r in parsed.rejected:
        if r.message_id is not None:
            results[r.message_id] = {"result": "drop", "details": r.reason}
    return {"results": results}


# --- Sentry -------------------------------------------------------------------------------------

_USER_KEYS = ("email", "username")  # anonymous ids when the Sentry user has no id


def sentry_key(auth_header: str | None = None, query: str | None = None) -> str | None:
    """The DSN public key of a Sentry request: from `X-Sentry-Auth` (`Sentry sentry_key=...,
    sentry_version=7`) or, as browser SDKs send it, the `sentry_key` query parameter."""
    if auth_header:
        text = auth_header.strip()
        if text[:7].lower() == "sentry ":
            text = text[7:]
        for part in text.split(","):
            name, _, value = part.strip().partition("=")
            if name.strip() == "sentry_key" and value.strip():
                return value.strip()
    if query:
        for name, value in parse_qsl(query):
            if name == "sentry_key" and value:
                return value
    return None


def _line(body: bytes, start: int) -> tuple[bytes, int]:
    end = body.find(b"\n", start)
    if end < 0:
        return body[start:], len(body)
    return body[start:end], end + 1


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(data)
    except _NOT_JSON as exc:
        raise InputError(f"{what} is not valid JSON ({exc})") from None
    if type(value) is not dict:
        raise InputError(f"{what} is not a JSON object")
    return value


def sentry_envelope(body: bytes, received_ms: int) -> Parsed:
    """A Sentry envelope (`/api/{project}/envelope/`): each `event` item (an error or a captured
    message) becomes a track event `Error`; other items are counted as ignored."""
    if len(body) > MAX_ENVELOPE_BYTES:
        raise TooLargeError(
            f"Sentry envelope is {len(body)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    line, pos = _line(body, 0)
    header = _json_object(line, "the envelope header")
    out = Parsed()
    dsn = header.get("dsn")
    if type(dsn) is str and urlsplit(dsn).username:
        out.write_key = urlsplit(dsn).username
    else:
        key = _dict(header.get("trace")).get("public_key")
        out.write_key = key if type(key) is str else None
    sent_ms = _sent_ms(header.get("sent_at"), "sent_at")
    received_at = iso(received_ms)
    index = -1
    while True:
        while pos < len(body) and body[pos] in b"\r\n":  # blank lines between items
            pos += 1
        if pos >= len(body):
            break
        index += 1
        _check_count(index + 1, "the envelope")
        line, pos = _line(body, pos)
        item = _json_object(line, f"item {index}'s header")
        length = item.get("length")
        if length is None:
            payload, pos = _line(body, pos)
        elif type(length) is int and 0 <= length <= len(body) - pos:
            payload, pos = body[pos : pos + length], pos + length
            if pos < len(body):
                if body[pos] != 0x0A:
                    raise InputError(f"item {index}: no newline after its {length}-byte payload")
                pos += 1
        else:
            raise InputError(
                f"item {index} declares length {length!r} but {len(body) - pos} bytes remain"
            )
        if item.get("type") != "event":
            out.ignored += 1
            continue
        message_id = _text(item.get("event_id"))
        try:
            error = _object(payload, "event payload as an object", MAX_ENVELOPE_BYTES)
            message_id = _text(error.get("event_id")) or message_id
            msg, client_ms = _sentry_message(error, message_id or _text(header.get("event_id")))
            _fits(msg)
            _accept(out, msg, client_ms, sent_ms, received_ms, received_at, payload)
            out.positions.append(index)
        except EventError as exc:
            out.rejected.append(Rejection(index, exc.message, message_id))
    return out


def _sentry_time(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is float or type(value) is int:  # Sentry sends seconds since the epoch
        seconds = float(value)
        if not 0 <= seconds < MAX_TIME_MS / 1000:
            raise EventError(f"timestamp {value!r} is outside 1970..9999")
        return int(seconds * 1000)
    return _time_ms(value, "timestamp")


def _sentry_tags(error: dict[str, Any]) -> dict[str, Any]:
    tags = error.get("tags")
    if type(tags) is list:  # the protocol also allows [[key, value], ...]
        return {t[0]: t[1] for t in tags if type(t) is list and len(t) == 2 and type(t[0]) is str}
    return _dict(tags)


def _sentry_message(
    error: dict[str, Any], message_id: str | None
) -> tuple[dict[str, Any], int | None]:
    user = _dict(error.get("user"))
    tags = _sentry_tags(error)
    msg: dict[str, Any] = {"type": "track", "event": "Error"}
    user_id = _text(user.get("id"))
    if user_id is not None:
        msg["userId"] = user_id
    else:
        anonymous = next((t for k in _USER_KEYS if (t := _text(user.get(k)))), None)
        if anonymous is None:
            raise EventError(
                "Sentry event has no user: call sentry_sdk.set_user({'id': ...}) "
                "(or Sentry.setUser) so Forewarn knows who hit the error"
            )
        msg["anonymousId"] = anonymous
    account = _text(tags.get(ACCOUNT_KEY)) or _text(tags.get("group_id"))
    account = account or _text(user.get(ACCOUNT_KEY)) or _text(user.get("group_id"))
    if account is not None:
        msg["context"] = {"groupId": account}
    exception = error.get("exception")
    values = exception if type(exception) is list else _dict(exception).get("values")
    main = _dict(values[-1]) if type(values) is list and values else {}  # the one raised last
    text = main.get("value")
    if text is None:
        logentry = _dict(error.get("logentry"))
        text = logentry.get("formatted", logentry.get("message"))
    if text is None:
        message = error.get("message")
        text = _dict(message).get("formatted") if type(message) is dict else message
    fingerprint = error.get("fingerprint")
    if type(fingerprint) is list and fingerprint != ["{{ default }}"]:
        grouping = _clip("/".join(str(part) for part in fingerprint))
    else:
        grouping = _clip(error.get("culprit")) or _clip(error.get("transaction"))
    level = error.get("level")
    props = {
        "type": _clip(main.get("type")),
        "message": _clip(text),
        "fingerprint": grouping,
        "level": level if type(level) is str else "error",
        "release": _clip(error.get("release")),
        "environment": _clip(error.get("environment")),
        "url": _clip(_dict(error.get("request")).get("url")),
    }
    msg["properties"] = {k: v for k, v in props.items() if v is not None}
    if message_id is not None:
        msg["messageId"] = message_id
    return msg, _sentry_time(error.get("timestamp"))
