"""Events: Segment-spec messages normalised into one Event, invalid ones rejected with a reason."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forewarn.errors import EventError
from forewarn.model import decode_event, event_from_dict, format_time, parse_time_ms

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wire-captures"


def test_track_with_context_group():
    e = event_from_dict(
        {
            "type": "track",
            "event": "Error",
            "userId": 42,
            "properties": {"fingerprint": "x"},
            "context": {"groupId": "acme"},
            "timestamp": "2026-11-23T10:00:00.250Z",
            "messageId": "m1",
        }
    )
    assert (e.kind, e.name, e.user_id, e.account_id, e.message_id) == (
        "track",
        "Error",
        "42",
        "acme",
        "m1",
    )
    assert e.properties == {"fingerprint": "x"}
    assert e.timestamp_ms == parse_time_ms("2026-11-23T10:00:00Z") + 250
    assert e.person == "42"


def test_identify_group_page_alias():
    ident = event_from_dict(
        {"type": "identify", "anonymousId": "a1", "traits": {"plan": "pro"}, "timestamp": 0}
    )
    assert ident.person == "a1" and ident.traits == {"plan": "pro"} and ident.timestamp_ms == 0
    grp = event_from_dict(
        {"type": "group", "userId": "u", "groupId": "acme", "traits": {"seats": 3}, "timestamp": 5}
    )
    assert grp.account_id == "acme" and grp.traits == {"seats": 3}
    pg = event_from_dict(
        {
            "type": "page",
            "userId": "u",
            "name": "Settings",
            "properties": {"path": "/s"},
            "timestamp": 1,
        }
    )
    assert pg.kind == "page" and pg.name == "Settings"
    al = event_from_dict({"type": "alias", "userId": "u", "previousId": "a1", "timestamp": 1})
    assert al.previous_id == "a1"


def test_original_timestamp_is_used_when_timestamp_is_missing():
    e = event_from_dict(
        {
            "type": "track",
            "event": "X",
            "userId": "u",
            "originalTimestamp": "2026-01-01T00:00:00+02:00",
        }
    )
    assert format_time(e.timestamp_ms) == "2025-12-31T22:00:00Z"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"event": "X", "userId": "u", "timestamp": 0}, "missing 'type'"),
        ({"type": "click", "userId": "u", "timestamp": 0}, "unknown type 'click'"),
        ({"type": "track", "event": "X", "timestamp": 0}, "neither 'userId' nor 'anonymousId'"),
        ({"type": "track", "userId": "u", "timestamp": 0}, "track has no 'event' name"),
        (
            {"type": "track", "event": "", "userId": "u", "timestamp": 0},
            "track has no 'event' name",
        ),
        ({"type": "group", "userId": "u", "timestamp": 0}, "group has no 'groupId'"),
        ({"type": "alias", "userId": "u", "timestamp": 0}, "alias needs both"),
        ({"type": "track", "event": "X", "userId": "u"}, "no 'timestamp'"),
        (
            {"type": "track", "event": "X", "userId": "u", "timestamp": "yesterday"},
            "is not ISO 8601",
        ),
        (
            {"type": "track", "event": "X", "userId": "u", "timestamp": 0, "properties": [1]},
            "got `array` - at `$.properties`",
        ),
        (
            {"type": "track", "event": "X", "userId": ["u"], "timestamp": 0},
            "not a valid Segment message",
        ),
    ],
)
def test_invalid_messages_say_why(message, reason):
    with pytest.raises(EventError) as caught:
        event_from_dict(message)
    assert reason in caught.value.message
    with pytest.raises(EventError) as again:
        decode_event(json.dumps(message))
    assert reason in again.value.message


@pytest.mark.parametrize("data", [b"{", b"[1,2]", b"null", b"\xff\xfe", b'"text"'])
def test_malformed_json_is_an_event_error(data):
    with pytest.raises(EventError):
        decode_event(data)


@given(st.binary(max_size=200))
def test_no_bytes_crash_the_decoder(data):
    with contextlib.suppress(EventError):
        decode_event(data)


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_time_round_trips(ms):
    assert parse_time_ms(format_time(ms)) == ms


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-1439, max_value=1439),
)
def test_times_with_microseconds_and_offsets_truncate_to_the_millisecond(when, offset_min):
    aware = when.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_time_ms(aware.isoformat()) == (aware - epoch) // timedelta(milliseconds=1)


def test_naive_times_are_utc():
    assert parse_time_ms("2026-01-01T00:00:00") == parse_time_ms("2026-01-01T00:00:00Z")
    assert parse_time_ms("2026-01-01 00:00:00") == parse_time_ms("2026-01-01T00:00:00+00:00")


def _segment_messages() -> list[dict[str, object]]:
    messages = []
    for name in ("captured_requests_all200.jsonl", "captured_requests_first503.jsonl"):
        for line in (CAPTURES / name).read_text().splitlines():
            request = json.loads(line)
            if request["path"] == "/v1/batch":
                messages.extend(json.loads(request["body_text"])["batch"])
    return messages


def test_messages_sent_by_real_segment_clients_decode():
    if not CAPTURES.is_dir():
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(f"wire captures not found at {CAPTURES}")
        pytest.skip(f"wire captures not found at {CAPTURES} (../shared/datasets)")
    messages = _segment_messages()
    assert len(messages) >= 5
    kinds = set()
    for raw in messages:
        event = decode_event(json.dumps(raw))
        kinds.add(event.kind)
        assert event.person == raw.get("userId") or event.person == raw.get("anonymousId")
        assert event.timestamp_ms == parse_time_ms(str(raw["timestamp"]))
        assert event.message_id == raw["messageId"]
    assert {"identify", "track"} <= kinds
