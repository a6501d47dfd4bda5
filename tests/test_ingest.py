"""Ingest: Segment, PostHog and Sentry requests become valid Segment-spec messages; bad items are
rejected one by one with a reason; limits hold exactly at their boundaries; clock skew is
corrected. The wire captures are real requests sent by unmodified client libraries."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forewarn import ingest, model
from forewarn.errors import ForewarnError, InputError, TooLargeError
from forewarn.ingest import (
    FUTURE_MS,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    correct_skew,
    iso,
    posthog,
    segment,
    sentry_envelope,
)

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wire-captures"
T0 = model.parse_time_ms("2026-11-23T10:00:00Z")


def ms(text: str) -> int:
    return model.parse_time_ms(text)


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def valid(parsed: ingest.Parsed) -> None:
    """Every accepted message reads back, through the model, as the event ingest returned."""
    assert len(parsed.messages) == len(parsed.events)
    for message, event in zip(parsed.messages, parsed.events, strict=True):
        assert model.event_from_dict(json.loads(json.dumps(message))) == event
        assert message["messageId"] and message["receivedAt"].endswith("Z")
        assert message["timestamp"].endswith("Z")


# --- the wire captures ----------------------------------------------------------------------------


def captured() -> list[dict[str, Any]]:
    if not CAPTURES.is_dir():
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(f"wire captures not found at {CAPTURES}")
        pytest.skip(f"wire captures not found at {CAPTURES} (../shared/datasets)")
    requests = []
    for name in ("captured_requests_all200.jsonl", "captured_requests_first503.jsonl"):
        requests += [json.loads(line) for line in (CAPTURES / name).read_text().splitlines()]
    return requests


def sentry_body(request: dict[str, Any]) -> bytes:
    """The captured envelope, with each item's `length` recomputed: the README says the frame's
    abs_path was rewritten after capture, which changed the payload's size but not its header."""
    lines = request["body_text"].encode().split(b"\n")
    for i in range(1, len(lines) - 1, 2):
        header = json.loads(lines[i])
        if "length" in header:
            header["length"] = len(lines[i + 1])
            lines[i] = json.dumps(header).encode()
    return b"\n".join(lines)


def parse_captured(request: dict[str, Any]) -> ingest.Parsed:
    received_ms = int(request["t"] * 1000)
    path = request["path"]
    if path == "/v1/batch":
        return segment(request["body_text"].encode(), "batch", received_ms)
    if path in ("/batch/", "/i/v1/analytics/events"):
        sent_at = request["headers"].get("PostHog-Request-Timestamp")
        return posthog(request["body_text"].encode(), received_ms, sent_at=sent_at)
    assert path == "/api/42/envelope/", path
    return sentry_envelope(sentry_body(request), received_ms)


def test_every_captured_request_parses_into_valid_messages():
    paths = set()
    for request in captured():
        parsed = parse_captured(request)
        paths.add(request["path"])
        assert parsed.messages and not parsed.rejected and not parsed.flagged, request["path"]
        valid(parsed)
        for event in parsed.events:
            assert event.person == "user-42"
            # corrected times land within a second of receipt: these clients sent at once
            assert 0 <= request["t"] * 1000 - event.timestamp_ms < 1500
    assert paths == {"/v1/batch", "/batch/", "/i/v1/analytics/events", "/api/42/envelope/"}


def test_segment_captures_keep_every_message_and_correct_its_time():
    for request in captured():
        if request["path"] != "/v1/batch":
            continue
        sent = json.loads(request["body_text"])
        parsed = parse_captured(request)
        received_ms = int(request["t"] * 1000)
        assert [m["messageId"] for m in parsed.messages] == [m["messageId"] for m in sent["batch"]]
        assert parsed.write_key == sent.get("writeKey")  # else the Basic-auth user name
        for original, message in zip(sent["batch"], parsed.messages, strict=True):
            expected = received_ms - (ms(sent["sentAt"]) - ms(original["timestamp"]))
            assert message["timestamp"] == iso(expected)
            assert message["originalTimestamp"] == original["timestamp"]
            assert message["receivedAt"] == iso(received_ms)
            assert message["type"] == original["type"]
            assert "writeKey" not in message


def test_posthog_v0_capture_maps_track_pageview_and_set():
    request = next(r for r in captured() if r["path"] == "/batch/")
    parsed = parse_captured(request)
    assert parsed.write_key == "phc_TEST_PROJECT_KEY"
    track, page, identify = parsed.messages
    assert (track["type"], track["event"], track["userId"]) == ("track", "API Error", "user-42")
    assert track["properties"]["error_rate"] == 0.12
    assert track["messageId"] == json.loads(request["body_text"])["batch"][0]["uuid"]
    assert (page["type"], page["name"]) == ("page", "/export")
    assert page["properties"]["path"] == "/export"
    assert page["properties"]["url"] == "https://app.example.com/export"
    assert (identify["type"], identify["traits"]) == ("identify", {"plan": "pro"})


def test_posthog_v1_capture_uses_the_request_timestamp_header():
    request = next(r for r in captured() if r["path"] == "/i/v1/analytics/events")
    parsed = parse_captured(request)
    assert parsed.write_key is None  # v1 sends the key as a Bearer token
    (message,) = parsed.messages
    sent = json.loads(request["body_text"])["batch"][0]
    header = request["headers"]["PostHog-Request-Timestamp"]
    expected = int(request["t"] * 1000) - (ms(header) - ms(sent["timestamp"]))
    assert message["timestamp"] == iso(expected)
    assert ingest.posthog_v1_results(parsed) == {"results": {sent["uuid"]: {"result": "ok"}}}


def test_sentry_captures_become_error_events():
    envelopes = [parse_captured(r) for r in captured() if "envelope" in r["path"]]
    assert len(envelopes) == 4
    for parsed in envelopes:
        assert parsed.write_key == "publickey123"
    captured_message, exception = envelopes[0].messages[0], envelopes[1].messages[0]
    assert captured_message["event"] == "Error" and captured_message["userId"] == "user-42"
    assert captured_message["properties"] == {
        "message": "Export failed: upstream timeout",
        "level": "info",
        "release": "demo@1.0.0",
        "environment": "test",
    }
    assert exception["properties"] == {
        "type": "ZeroDivisionError",
        "message": "division by zero",
        "level": "error",
        "release": "demo@1.0.0",
        "environment": "test",
    }
    assert exception["messageId"] == "f0b7be73870e4ccf8e0c7a1c15aad946"


def test_a_retried_request_carries_the_same_message_ids():
    """Clients resend a failed batch whole; the ids let the event log keep each event once."""
    seen: dict[tuple[str, ...], int] = {}
    for request in captured():
        if "envelope" not in request["path"]:
            ids = tuple(m["messageId"] for m in parse_captured(request).messages)
            seen[ids] = seen.get(ids, 0) + 1
    # after its 503, the Segment 2.4.0, PostHog v0 and PostHog v1 batch each came again
    assert sorted(seen.values()).count(2) == 3


# --- Segment --------------------------------------------------------------------------------------


def track(**extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Export Failed", "userId": "u1", **extra}


def test_one_bad_message_never_sinks_its_batch():
    big = track(properties={"log": "x" * MAX_EVENT_BYTES})
    batch = [
        track(messageId="ok-1"),
        {"event": "X", "userId": "u1", "messageId": "no-type"},
        {"type": "track", "userId": "u1"},
        [1, 2],
        big,
        track(timestamp="yesterday"),
        track(messageId="ok-2", properties=[1]),
        track(sentAt=True),
        track(messageId="ok-3"),
    ]
    parsed = segment(body({"batch": batch}), "batch", T0)
    assert [m["messageId"] for m in parsed.messages] == ["ok-1", "ok-3"]
    reasons = {r.index: r.reason for r in parsed.rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert "missing 'type'" in reasons[1]
    assert "track has no 'event' name" in reasons[2]
    assert "not a JSON object" in reasons[3]
    assert "over the 32768-byte limit" in reasons[4]
    assert "is not ISO 8601" in reasons[5]
    assert "got `array` - at `$.properties`" in reasons[6]
    assert "sentAt True is not ISO 8601" in reasons[7]
    assert parsed.rejected[0].message_id == "no-type"
    valid(parsed)


def test_single_message_routes_fix_the_type_and_lift_the_write_key():
    sent = {"userId": "u1", "event": "Login", "writeKey": "wk", "type": "identify"}
    parsed = segment(body(sent), "track", T0)
    (message,) = parsed.messages
    assert message["type"] == "track" and parsed.events[0].name == "Login"
    assert parsed.write_key == "wk" and "writeKey" not in message
    for kind in ("identify", "page", "screen"):
        assert segment(body({"userId": "u1"}), kind, T0).events[0].kind == kind
    alias = segment(body({"userId": "u1", "previousId": "a1"}), "alias", T0)
    assert alias.events[0].previous_id == "a1"
    group = segment(body({"userId": "u1"}), "group", T0)
    assert "group has no 'groupId'" in group.rejected[0].reason
    with pytest.raises(ValueError):
        segment(b"{}", "v1/track", T0)


def test_batch_context_applies_to_every_message_under_its_own():
    batch = [track(), track(context={"groupId": "own", "ip": "1.2.3.4"})]
    sent = {"batch": batch, "context": {"groupId": "acme", "library": {"name": "x"}}}
    parsed = segment(body(sent), "batch", T0)
    assert [e.account_id for e in parsed.events] == ["acme", "own"]
    assert parsed.messages[1]["context"] == {
        "groupId": "own",
        "library": {"name": "x"},
        "ip": "1.2.3.4",
    }


def test_a_message_without_an_id_gets_a_stable_one():
    first = segment(body({"batch": [track(timestamp="2026-11-23T09:00:00Z")]}), "batch", T0)
    again = segment(body({"batch": [track(timestamp="2026-11-23T09:00:00Z")]}), "batch", T0 + 5)
    other = segment(body({"batch": [track(timestamp="2026-11-23T09:00:01Z")]}), "batch", T0)
    assert first.messages[0]["messageId"].startswith("fw-")
    assert first.messages[0]["messageId"] == again.messages[0]["messageId"]
    assert first.messages[0]["messageId"] != other.messages[0]["messageId"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "not a Segment batch"),
        (b'{"sentAt": "2026-11-23T10:00:00Z"}', "missing required field `batch`"),
        (b'{"batch": {}}', "not a Segment batch"),
        (b'{"batch": [], "sentAt": "soon"}', "sentAt 'soon' is not ISO 8601"),
    ],
)
def test_an_unusable_body_is_a_400_that_says_why(data, reason):
    with pytest.raises(InputError) as caught:
        segment(data, "batch", T0)
    assert reason in caught.value.message and caught.value.status == 400


# --- limits ---------------------------------------------------------------------------------------


def sized(message: dict[str, Any], size: int) -> bytes:
    """The message as JSON, padded through a property to exactly `size` bytes."""
    message = {**message, "properties": {"pad": ""}}
    short = len(body(message))
    message["properties"]["pad"] = "x" * (size - short)
    data = body(message)
    assert len(data) == size
    return data


def test_an_event_of_exactly_32_kb_is_accepted_and_one_byte_more_rejected():
    at = sized(track(messageId="at"), MAX_EVENT_BYTES)
    past = sized(track(messageId="past"), MAX_EVENT_BYTES + 1)
    parsed = segment(b'{"batch": [' + at + b"," + past + b"]}", "batch", T0)
    assert [m["messageId"] for m in parsed.messages] == ["at"]
    assert parsed.rejected[0].index == 1
    assert parsed.rejected[0].reason.startswith(f"message is {MAX_EVENT_BYTES + 1} bytes")
    single = segment(past, "track", T0)
    assert not single.messages and single.rejected[0].index == 0


def padded(data: bytes, size: int) -> bytes:
    assert len(data) <= size
    return data + b" " * (size - len(data))  # JSON allows trailing whitespace


def test_a_body_of_exactly_500_kb_is_read_and_one_byte_more_is_a_413():
    data = body({"batch": [track(messageId=f"m{i}") for i in range(100)]})
    assert len(segment(padded(data, MAX_BATCH_BYTES), "batch", T0).messages) == 100
    parsers: list[Callable[[bytes], object]] = [
        lambda b: segment(b, "batch", T0),
        lambda b: posthog(b, T0),
    ]
    for parse in parsers:
        with pytest.raises(TooLargeError) as caught:
            parse(padded(data, MAX_BATCH_BYTES + 1))
        assert caught.value.status == 413 and "over the 512000-byte limit" in caught.value.message


def test_2500_events_are_read_and_2501_are_a_413():
    events = [{"type": "track", "event": "E", "userId": i} for i in range(MAX_BATCH_EVENTS + 1)]
    assert len(segment(body({"batch": events[:-1]}), "batch", T0).messages) == MAX_BATCH_EVENTS
    with pytest.raises(TooLargeError) as caught:
        segment(body({"batch": events}), "batch", T0)
    assert "2501 items, over the limit of 2500" in caught.value.message
    ph = [{"event": "E", "distinct_id": i} for i in range(MAX_BATCH_EVENTS + 1)]
    assert len(posthog(body({"batch": ph[:-1]}), T0).messages) == MAX_BATCH_EVENTS
    with pytest.raises(TooLargeError):
        posthog(body({"batch": ph}), T0)


# --- time -----------------------------------------------------------------------------------------

times = st.integers(min_value=ms("2000-01-01T00:00:00Z"), max_value=ms("2100-01-01T00:00:00Z"))
offsets = st.integers(min_value=-30 * 86_400_000, max_value=30 * 86_400_000)
delays = st.integers(min_value=0, max_value=7 * 86_400_000)


@given(happened=times, clock_error=offsets, queued=delays, transit=st.integers(0, 60_000))
def test_skew_correction_cancels_any_client_clock_error(happened, clock_error, queued, transit):
    """A client whose clock is off by `clock_error` stamps the event and its sending with that
    error; the corrected time is off only by the time in transit, whatever the clock error."""
    stamped = happened + clock_error
    sent = happened + queued + clock_error
    received = happened + queued + transit
    assert correct_skew(stamped, sent, received) == happened + transit
    assert correct_skew(stamped, None, received) == stamped
    assert correct_skew(None, sent, received) == received
    # and end to end, through a Segment batch with a per-message sentAt
    message = track(timestamp=iso(stamped), sentAt=iso(sent), messageId="m")
    parsed = segment(body({"batch": [message]}), "batch", received)
    assert parsed.events[0].timestamp_ms == happened + transit


@given(st.integers(min_value=0, max_value=model.MAX_TIME_MS - 1))
def test_iso_is_exact_to_the_millisecond(when):
    assert model.parse_time_ms(iso(when)) == when
    plain = datetime(1970, 1, 1) + timedelta(milliseconds=when)
    assert iso(when) == plain.isoformat(timespec="milliseconds") + "Z"


def test_per_message_sent_at_wins_over_the_batchs():
    batch = [
        track(timestamp="2026-11-23T09:00:00Z", messageId="a"),
        track(timestamp="2026-11-23T09:00:00Z", sentAt="2026-11-23T09:30:00Z", messageId="b"),
        track(messageId="c"),
    ]
    parsed = segment(body({"batch": batch, "sentAt": "2026-11-23T09:10:00Z"}), "batch", T0)
    assert [iso(e.timestamp_ms) for e in parsed.events] == [
        "2026-11-23T09:50:00.000Z",
        "2026-11-23T09:30:00.000Z",
        iso(T0),  # no timestamp: the moment of receipt
    ]


def test_events_more_than_23_hours_ahead_are_flagged_not_rejected():
    batch = [
        track(timestamp=T0 + FUTURE_MS, messageId="at"),
        track(timestamp=T0 + FUTURE_MS + 1, messageId="past"),
        track(timestamp=T0 - 1000, messageId="now"),
        track(timestamp=T0 + 2 * FUTURE_MS, messageId="far"),
    ]
    parsed = segment(body({"batch": batch}), "batch", T0)
    assert not parsed.rejected
    assert [parsed.messages[i]["messageId"] for i in parsed.flagged] == ["past", "far"]


def test_a_correction_before_1970_is_rejected_with_the_fix():
    message = track(timestamp="2026-11-23T09:00:00Z", sentAt="2100-01-01T00:00:00Z")
    parsed = segment(body({"batch": [message]}), "batch", 1_000)
    assert "outside 1970..9999 after clock-skew correction" in parsed.rejected[0].reason


# --- PostHog --------------------------------------------------------------------------------------


def ph(event: str, **extra: Any) -> dict[str, Any]:
    return {"event": event, "distinct_id": "u1", "uuid": f"id-{event}", **extra}


def test_posthog_special_events_map_to_segment_calls():
    batch = [
        ph("$identify", **{"$set": {"plan": "pro"}}),
        ph(
            "$groupidentify",
            distinct_id="$company_acme",
            properties={"$group_type": "company", "$group_key": "acme", "$group_set": {"seats": 5}},
        ),
        ph("$screen", properties={"$screen_name": "Settings"}),
        ph("$create_alias", properties={"alias": "anon-1"}),
        ph("Report Run", properties={"$groups": {"company": "acme", "project": "p1"}}),
        ph("$pageview", properties={"$current_url": "https://x.io/a/b?q=1", "$pathname": "/a/b"}),
    ]
    parsed = posthog(body({"api_key": "phc_k", "batch": batch}), T0)
    assert not parsed.rejected and parsed.write_key == "phc_k"
    valid(parsed)
    identify, group, screen, alias, report, page = parsed.events
    assert identify.kind == "identify" and identify.traits == {"plan": "pro"}
    assert (group.kind, group.account_id, group.traits) == ("group", "acme", {"seats": 5})
    assert group.user_id is None and group.anonymous_id == "$company_acme"
    assert (screen.kind, screen.name) == ("screen", "Settings")
    assert (alias.kind, alias.user_id, alias.previous_id) == ("alias", "u1", "anon-1")
    assert (report.kind, report.name, report.account_id) == ("track", "Report Run", "acme")
    assert (page.name, page.properties["path"]) == ("/a/b", "/a/b")


def test_posthog_account_group_type_picks_the_account():
    batch = [
        ph("Report Run", properties={"$groups": {"project": "p1", "company": "acme"}}),
        ph("$groupidentify", properties={"$group_type": "project", "$group_key": "p1"}),
    ]
    parsed = posthog(body(batch), T0, account_group_type="company")
    assert [e.account_id for e in parsed.events] == ["acme"]
    assert parsed.ignored == 1


def test_posthog_js_events_carry_the_id_and_token_in_properties():
    event = {
        "event": "$pageview",
        "properties": {"distinct_id": "u7", "token": "phc_js", "$current_url": "https://x.io/"},
        "timestamp": "2026-11-23T09:59:00Z",
        "offset": 10,
    }
    parsed = posthog(body([event]), T0)
    assert parsed.write_key == "phc_js"
    assert "token" not in parsed.messages[0]["properties"]
    assert parsed.events[0].person == "u7" and parsed.events[0].name == "/"


def test_posthog_offset_and_single_capture():
    event = {"api_key": "phc_one", "event": "Login", "distinct_id": 3, "offset": 1500}
    parsed = posthog(body(event), T0)
    assert parsed.write_key == "phc_one"
    assert parsed.events[0].timestamp_ms == T0 - 1500 and parsed.events[0].user_id == "3"


def test_posthog_rejections_say_why_and_v1_answers_drop():
    batch = [
        ph("Login"),
        {"event": "Login", "uuid": "no-id"},
        {"distinct_id": "u1", "uuid": "x"},
        7,
    ]
    parsed = posthog(body({"batch": batch}), T0)
    reasons = [r.reason for r in parsed.rejected]
    assert "no 'distinct_id'" in reasons[0] and "no 'event' name" in reasons[1]
    assert "not a JSON object" in reasons[2]
    results = ingest.posthog_v1_results(parsed)["results"]
    assert results["id-Login"] == {"result": "ok"}
    assert results["no-id"]["result"] == "drop"
    for data in (b"3", b'{"batch": 3}', b"nope"):
        with pytest.raises(InputError):
            posthog(data, T0)


# --- Sentry ---------------------------------------------------------------------------------------


def envelope(
    header: dict[str, Any], *items: tuple[dict[str, Any], bytes], length: bool = True
) -> bytes:
    out = [json.dumps(header).encode()]
    for item_header, payload in items:
        if length:
            item_header = {**item_header, "length": len(payload)}
        out += [json.dumps(item_header).encode(), payload]
    return b"\n".join(out) + b"\n"


ERROR = {
    "event_id": "9ec79c33ec9942ab8353589fcb2e04dc",
    "timestamp": 1795428000.25,
    "level": "fatal",
    "exception": {
        "values": [
            {"type": "KeyError", "value": "'rate'"},
            {"type": "ExportError", "value": "export failed\nwhile writing"},
        ]
    },
    "fingerprint": ["billing-export-timeout"],
    "tags": {"account_id": "acme", "region": "eu"},
    "user": {"id": 42, "email": "ada@acme.io"},
    "request": {"url": "https://app.example.com/export"},
    "release": "web@2.1.0",
    "environment": "production",
}


def test_an_error_item_becomes_an_error_event_and_other_items_are_ignored():
    data = envelope(
        {"event_id": ERROR["event_id"], "dsn": "https://key123@o1.ingest.sentry.io/42"},
        ({"type": "session"}, b'{"sid": "s1", "status": "ok"}'),
        ({"type": "event"}, body(ERROR)),
        ({"type": "client_report"}, b'{"discarded_events": []}'),
        ({"type": "attachment", "filename": "log.txt"}, b"line one\nline two"),
    )
    parsed = sentry_envelope(data, T0)
    assert parsed.write_key == "key123" and parsed.ignored == 3 and not parsed.rejected
    valid(parsed)
    (message,) = parsed.messages
    assert message["userId"] == "42" and message["context"] == {"groupId": "acme"}
    assert message["messageId"] == ERROR["event_id"]
    assert message["properties"] == {
        "type": "ExportError",
        "message": "export failed\nwhile writing",
        "fingerprint": "billing-export-timeout",
        "level": "fatal",
        "release": "web@2.1.0",
        "environment": "production",
        "url": "https://app.example.com/export",
    }
    assert parsed.events[0].timestamp_ms == 1795428000250


def test_sentry_items_without_length_and_the_user_and_account_fallbacks():
    by_email = {**ERROR, "user": {"email": "ada@acme.io", "account_id": "acme"}, "tags": None}
    nobody = {**ERROR, "user": {"ip_address": "{{auto}}"}}
    message_only = {"logentry": {"formatted": "slow export"}, "user": {"username": "ada"}}
    culprit = {**ERROR, "fingerprint": ["{{ default }}"], "culprit": "app.export in run"}
    tagged = {**ERROR, "tags": [["group_id", "initech"], ["x", "y"]], "fingerprint": ["a", "b"]}
    data = envelope(
        {"sent_at": iso(T0)},
        *[({"type": "event"}, body(e)) for e in (by_email, nobody, message_only, culprit, tagged)],
        length=False,
    )
    parsed = sentry_envelope(data, T0 + 1000)
    assert [r.index for r in parsed.rejected] == [1]
    assert "Sentry event has no user" in parsed.rejected[0].reason
    email, message_only_event, culprit_event, tagged_event = parsed.events
    assert (email.user_id, email.anonymous_id, email.account_id) == (None, "ada@acme.io", "acme")
    assert message_only_event.properties == {"message": "slow export", "level": "error"}
    assert message_only_event.timestamp_ms == T0 + 1000  # no timestamp: the moment of receipt
    assert culprit_event.properties["fingerprint"] == "app.export in run"
    assert tagged_event.account_id == "initech" and tagged_event.properties["fingerprint"] == "a/b"
    # stamped 10:00:00.250 and sent at 10:00:00 by its clock, received at 10:00:01 by ours
    assert email.timestamp_ms == T0 + 1000 - (T0 - (T0 + 250))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json\n", "envelope header is not valid JSON"),
        (b'{}\n{"type": "event", "length": 50}\n{}\n', "declares length 50 but 3 bytes remain"),
        (b'{}\n{"type": "event", "length": 2}\n{}x\n', "no newline after its 2-byte payload"),
        (b"{}\n[1]\n{}\n", "item 0's header is not a JSON object"),
    ],
)
def test_an_envelope_that_cannot_be_framed_is_a_400(data, reason):
    with pytest.raises(InputError) as caught:
        sentry_envelope(data, T0)
    assert reason in caught.value.message


def test_a_bad_error_payload_rejects_only_its_item():
    data = b'{}\n{"type":"event"}\n{oops\n{"type":"event"}\n' + body({**ERROR, "event_id": "e2"})
    parsed = sentry_envelope(data, T0)
    assert [m["messageId"] for m in parsed.messages] == ["e2"]
    assert parsed.rejected[0].index == 0 and "not valid JSON" in parsed.rejected[0].reason


def test_an_error_event_is_held_to_the_event_limit():
    long_id = {**ERROR, "user": {"id": "u" * MAX_EVENT_BYTES}}
    parsed = sentry_envelope(envelope({}, ({"type": "event"}, body(long_id))), T0)
    assert "the message built from it is" in parsed.rejected[0].reason
    long_text = {**ERROR, "exception": {"values": [{"type": "E", "value": "v" * 50_000}]}}
    (event,) = sentry_envelope(envelope({}, ({"type": "event"}, body(long_text))), T0).events
    assert len(event.properties["message"]) == 1000  # texts are cut, not rejected


def test_sentry_key_reads_the_auth_header_or_the_query():
    header = "Sentry sentry_key=publickey123, sentry_version=7, sentry_client=sentry.python/2.75.0"
    assert ingest.sentry_key(header) == "publickey123"
    assert ingest.sentry_key(None, "sentry_version=7&sentry_key=abc") == "abc"
    assert ingest.sentry_key("Bearer x", "") is None


@example(b'"\x80"')  # invalid UTF-8 inside a string: msgspec raises UnicodeDecodeError
@example(b'[{"event": "\xff"}]')
@example(b'{"batch": [{"type": "track", "event": "\xc3"}]}')
@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_no_bytes_crash_the_parsers(data):
    """Whatever arrives, the parsers answer with a Parsed or a ForewarnError."""
    parsers: list[Callable[[bytes], object]] = [
        lambda b: segment(b, "batch", T0),
        lambda b: segment(b, "track", T0),
        lambda b: posthog(b, T0),
        lambda b: sentry_envelope(b, T0),
    ]
    for parse in parsers:
        with contextlib.suppress(ForewarnError):
            parse(data)


def test_an_item_that_is_not_utf_8_is_rejected_alone():
    good = json.dumps(track(messageId="ok", timestamp=T0)).encode()
    bad = b'{"type": "track", "event": "\xff", "userId": "u", "messageId": "bad"}'
    parsed = segment(b'{"batch": [' + good + b"," + bad + b"]}", "batch", T0)
    assert [m["messageId"] for m in parsed.messages] == ["ok"]
    assert [r.index for r in parsed.rejected] == [1]
    assert "not valid JSON" in parsed.rejected[0].reason


def test_messages_round_trip_through_json():
    parsed = segment(body({"batch": [track(messageId="m", timestamp=T0)]}), "batch", T0)
    assert msgspec.json.decode(msgspec.json.encode(parsed.messages[0]))["timestamp"] == iso(T0)


def test_a_nul_character_in_an_id_rejects_that_event_only():
    """Ids are text: a NUL inside one (which PostgreSQL's text refuses) rejects its event with
    the reason, and the rest of the batch is stored."""
    body = json.dumps(
        {
            "batch": [
                {"type": "track", "event": "Login", "userId": "a\u0000b", "messageId": "m1"},
                {"type": "track", "event": "Lo\u0000gin", "userId": "u", "messageId": "m2"},
                {"type": "track", "event": "Login", "userId": "u", "messageId": "m3"},
            ]
        }
    ).encode()
    parsed = ingest.segment(body, "batch", 1_795_428_000_500)
    assert [m["messageId"] for m in parsed.messages] == ["m3"]
    assert [r.index for r in parsed.rejected] == [0, 1]
    assert all("NUL character" in r.reason for r in parsed.rejected)
