"""The webhook channel against a real HTTP receiver on loopback; signatures checked with the
reference `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import msgspec
import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from forewarn import clock, netguard
from forewarn.channel_webhook import (
    BACKOFF_BASE_MS,
    BACKOFF_CAP_MS,
    WebhookChannel,
    retry_after_ms,
    retry_delay_ms,
    slack_body,
    standard_body,
)
from forewarn.channels import Channel, Failed, Gone, Outcome, Outgoing, Retry, Sent
from forewarn.errors import InputError
from tests.receiver import Answer, receiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another secret, 32 bytes long!!!").decode()


MESSAGE = Outgoing(
    id=1,
    key="msg_storage-85_acct-7_1_webhook",
    channel="webhook",
    workspace=1,
    trigger="storage-85",
    subject="acct-7",
    scope="account",
    title="Storage almost full",
    text="Acme is at 91% of its storage <plan> & growing.",
    data={"evidence": {"ratio": 0.91}, "traits": {"plan": "pro"}},
)


def outgoing(**overrides: Any) -> Outgoing:
    return msgspec.structs.replace(MESSAGE, **overrides)


def send(channel: WebhookChannel, *messages: Outgoing) -> list[Outcome]:
    async def go() -> list[Outcome]:
        try:
            return [await channel.send(m) for m in messages]
        finally:
            await channel.aclose()

    return asyncio.run(go())


def test_the_channel_implements_the_protocol():
    channel: Channel = WebhookChannel("http://example.com/hook", SECRET)
    assert channel.name == "webhook" and channel.deduplicates
    asyncio.run(channel.aclose())


def test_a_signed_standard_webhook_verifies_with_the_reference_library():
    with receiver() as r:
        [outcome] = send(WebhookChannel(r.url + "/hook", SECRET, allow_private=True), outgoing())
    assert isinstance(outcome, Sent)
    [seen] = r.seen
    assert seen.path == "/hook" and seen.headers["content-type"] == "application/json"
    payload = standardwebhooks.Webhook(SECRET).verify(seen.body, seen.headers)
    assert payload["type"] == "outreach.created"
    assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None
    assert payload["data"] == {
        "trigger": "storage-85",
        "subject": "acct-7",
        "scope": "account",
        "title": "Storage almost full",
        "text": "Acme is at 91% of its storage <plan> & growing.",
        "evidence": {"ratio": 0.91},
        "traits": {"plan": "pro"},
    }
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(OTHER_SECRET).verify(seen.body, seen.headers)


def test_the_same_key_gives_the_same_webhook_id_and_body_on_every_resend():
    payload = standard_body(outgoing(), clock.now_ms())  # rendered once, when decided
    message = outgoing(data={"payload": payload})
    with receiver(Answer(503)) as r:
        first, second = send(
            WebhookChannel(r.url, SECRET, allow_private=True),
            message,
            outgoing(data={"payload": payload}, attempt=2),
        )
    assert isinstance(first, Retry) and isinstance(second, Sent)
    ids = {s.headers["webhook-id"] for s in r.seen}
    assert ids == {message.key}
    assert r.seen[0].body == r.seen[1].body
    for s in r.seen:
        assert standardwebhooks.Webhook(SECRET).verify(s.body, s.headers) == payload


def test_410_means_the_endpoint_is_gone():
    with receiver(Answer(410, body=b"no such hook")) as r:
        [outcome] = send(WebhookChannel(r.url + "/h", SECRET, allow_private=True), outgoing())
    assert isinstance(outcome, Gone)
    assert outcome.endpoints == (r.url + "/h",)
    assert "410" in outcome.detail and "no such hook" in outcome.detail


def test_a_server_error_is_retried_then_sent():
    with receiver(Answer(500)) as r:
        outcomes = send(WebhookChannel(r.url, SECRET, allow_private=True), outgoing(), outgoing())
    assert isinstance(outcomes[0], Retry) and outcomes[0].after_ms is None
    assert isinstance(outcomes[1], Sent)
    assert len(r.seen) == 2


def test_retry_after_is_honoured_in_seconds_and_as_a_date():
    now_ms = 1_780_000_000_000
    later = datetime.fromtimestamp(now_ms / 1000 + 90, UTC)
    script = [
        Answer(429, {"Retry-After": "120"}),
        Answer(503, {"Retry-After": format_datetime(later, usegmt=True)}),
        Answer(408),
    ]
    with receiver(*script) as r:
        channel = WebhookChannel(r.url, SECRET, allow_private=True, now_ms=lambda: now_ms)
        outcomes = send(channel, outgoing(), outgoing(), outgoing())
    assert [o.after_ms if isinstance(o, Retry) else o for o in outcomes] == [120_000, 90_000, None]


def test_other_client_errors_fail_and_redirects_are_not_followed():
    with receiver(Answer(400, body=b"bad"), Answer(302, {"Location": "/elsewhere"})) as r:
        bad, moved = send(WebhookChannel(r.url, SECRET, allow_private=True), outgoing(), outgoing())
    assert isinstance(bad, Failed) and "400" in bad.detail and "bad" in bad.detail
    assert isinstance(moved, Failed) and "redirects are not followed" in moved.detail
    assert [s.path for s in r.seen] == ["/", "/"]


def test_a_refused_connection_and_a_timeout_are_retried():
    with receiver() as r:
        port = r.url.rsplit(":", 1)[1]
    [refused] = send(
        WebhookChannel(f"http://127.0.0.1:{port}", SECRET, allow_private=True), outgoing()
    )
    assert isinstance(refused, Retry) and "ConnectError" in refused.detail
    hold = threading.Event()
    with receiver(Answer(hold=hold)) as r:
        channel = WebhookChannel(r.url, SECRET, allow_private=True, timeout_s=0.2)
        [slow] = send(channel, outgoing())
    assert isinstance(slow, Retry) and "timed out" in slow.detail


def test_settings_and_to_override_the_url_and_secret():
    with receiver() as default, receiver() as per_trigger, receiver() as addressed:
        channel = WebhookChannel(default.url, SECRET, allow_private=True)
        send(
            channel,
            outgoing(settings={"url": per_trigger.url, "secret": OTHER_SECRET}),
            outgoing(to=addressed.url, settings={"url": per_trigger.url}),
        )
    assert default.seen == []
    [seen] = per_trigger.seen
    standardwebhooks.Webhook(OTHER_SECRET).verify(seen.body, seen.headers)
    [seen] = addressed.seen
    standardwebhooks.Webhook(SECRET).verify(seen.body, seen.headers)


def test_a_missing_or_malformed_secret_is_explained():
    with pytest.raises(InputError, match="whsec_"):
        WebhookChannel("https://example.com/hook", "not base64!")
    with receiver() as r:
        missing, bad = send(
            WebhookChannel(r.url, "", allow_private=True),
            outgoing(),
            outgoing(settings={"secret": "whsec_%%%"}),
        )
    assert isinstance(missing, Failed) and "FOREWARN_WEBHOOK_SECRET" in missing.detail
    assert isinstance(bad, Failed) and "whsec_" in bad.detail
    assert r.seen == []


def test_slack_format_shape():
    with receiver() as r:
        [outcome] = send(
            WebhookChannel(r.url, "", allow_private=True), outgoing(settings={"format": "slack"})
        )
    assert isinstance(outcome, Sent)
    body = json.loads(r.seen[0].body)
    assert body["text"].startswith("Storage almost full\n")
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "context"]
    assert body["blocks"][0]["text"] == {"type": "plain_text", "text": "Storage almost full"}
    section = body["blocks"][1]["text"]
    assert section["type"] == "mrkdwn" and "&lt;plan&gt; &amp; growing" in section["text"]
    assert "storage-85" in body["blocks"][2]["elements"][0]["text"]


def test_slack_urls_get_the_slack_format(monkeypatch):
    async def to_loopback(host: str, port: int) -> list[str]:
        assert host == "hooks.slack.com"
        return ["127.0.0.1"]

    monkeypatch.setattr(netguard, "resolve", to_loopback)
    with receiver() as r:
        port = r.url.rsplit(":", 1)[1]
        url = f"http://hooks.slack.com:{port}/services/T0/B0/secret"
        [outcome] = send(WebhookChannel(url, SECRET, allow_private=True), outgoing())
    assert isinstance(outcome, Sent) and "secret" not in outcome.detail
    [seen] = r.seen
    assert seen.headers["host"] == f"hooks.slack.com:{port}"
    assert set(json.loads(seen.body)) == {"text", "blocks"}


def test_slack_body_without_title_or_text():
    body = slack_body(outgoing(title="", text=""))
    assert body["text"] == "storage-85"
    assert [b["type"] for b in body["blocks"]] == ["context"]


def test_a_body_that_is_not_json_fails():
    message = outgoing(data={"evidence": {"when": object()}})
    [outcome] = send(WebhookChannel("http://example.com", SECRET), message)
    assert isinstance(outcome, Failed) and "cannot be written as JSON" in outcome.detail


def test_a_garbled_answer_still_counts_by_its_status():
    with receiver(Answer(500, {"Content-Encoding": "gzip"}, b"not gzip at all")) as r:
        [outcome] = send(WebhookChannel(r.url, SECRET, allow_private=True), outgoing())
    assert isinstance(outcome, Retry) and "500" in outcome.detail


def test_unknown_format_fails():
    [outcome] = send(
        WebhookChannel("http://example.com", SECRET), outgoing(settings={"format": "teams"})
    )
    assert isinstance(outcome, Failed) and "unknown webhook format 'teams'" in outcome.detail


def test_private_targets_are_refused_unless_allowed():
    with receiver() as r:
        [outcome] = send(WebhookChannel(r.url, SECRET), outgoing())
        assert r.seen == []
    assert isinstance(outcome, Failed)
    assert "loopback" in outcome.detail and "FOREWARN_WEBHOOK_ALLOW_PRIVATE=1" in outcome.detail
    [no_url, scheme] = send(
        WebhookChannel("", SECRET), outgoing(), outgoing(to="file:///etc/passwd")
    )
    assert isinstance(no_url, Failed) and "FOREWARN_WEBHOOK_URL" in no_url.detail
    assert isinstance(scheme, Failed) and "only http:// and https://" in scheme.detail


def test_a_client_passed_in_is_used_and_left_open():
    async def go(url: str) -> None:
        async with netguard.guarded_client(allow_private=True, timeout_s=5) as client:
            channel = WebhookChannel(url, SECRET, client=client)
            assert isinstance(await channel.send(outgoing()), Sent)
            await channel.aclose()
            assert not client.is_closed

    with receiver() as r:
        asyncio.run(go(r.url))
    assert len(r.seen) == 1


# --- back-off ---


def test_retry_delay_ceiling_doubles_from_30s_to_a_6h_cap():
    class Top(random.Random):
        def random(self) -> float:
            return 0.999999999

    top = [retry_delay_ms(a, Top()) for a in range(1, 14)]
    assert top[0] == pytest.approx(30_000, abs=1)
    assert top[1] == pytest.approx(60_000, abs=1)
    assert top[9] == pytest.approx(256 * 60_000, abs=1)
    assert top[10:] == [pytest.approx(BACKOFF_CAP_MS, abs=1)] * 3


@given(st.integers(min_value=-3, max_value=10_000), st.integers())
def test_retry_delay_is_full_jitter_within_the_ceiling(attempt, seed):
    delay = retry_delay_ms(attempt, random.Random(seed))
    ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** min(max(attempt, 1) - 1, 32))
    assert 0 <= delay < ceiling


def test_retry_after_parsing():
    now_ms = 1_780_000_000_000
    assert retry_after_ms("7", now_ms) == 7000
    assert retry_after_ms(None, now_ms) is None
    assert retry_after_ms("soon", now_ms) is None
    assert retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT", now_ms) == 0  # in the past
