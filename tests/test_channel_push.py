"""The push channel against a real push endpoint on loopback that does what a push service and
a browser do: checks the VAPID token (ES256, audience = the endpoint's origin) and decrypts the
aes128gcm body with the subscription's private key and auth secret."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from typing import Any

import http_ece
import msgspec
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from forewarn import netguard
from forewarn.channel_push import (
    MAX_PAYLOAD_BYTES,
    PushChannel,
    generate_vapid_keys,
    push_payload,
    topic,
)
from forewarn.channels import Channel, Failed, Gone, Outcome, Outgoing, Retry, Sent
from forewarn.errors import InputError
from tests.receiver import Answer, Seen, receiver

VAPID_PRIVATE, VAPID_PUBLIC = generate_vapid_keys()
SUBJECT = "mailto:support@example.com"
NOW_MS = 1_780_000_000_000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Browser:
    """One push subscription, made as a browser makes it: a P-256 key pair and an auth secret."""

    def __init__(self, endpoint: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.subscription = {
            "endpoint": endpoint,
            "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)},
        }

    def decrypt(self, seen: Seen) -> dict[str, Any]:
        assert seen.headers["content-encoding"] == "aes128gcm"
        plain = http_ece.decrypt(
            seen.body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return dict(json.loads(plain))


def verify_vapid(authorization: str, audience: str) -> dict[str, Any]:
    """The push service's check (RFC 8292): the token is ES256-signed by the key in `k`, for
    this origin, not expired."""
    scheme, params = authorization.split(" ", 1)
    assert scheme == "vapid"
    parts = dict(p.strip().split("=", 1) for p in params.split(","))
    assert parts["k"] == VAPID_PUBLIC
    head, body, signature = parts["t"].split(".")
    assert json.loads(unb64url(head)) == {"typ": "JWT", "alg": "ES256"}
    raw = unb64url(signature)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(parts["k"]))
    der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    public.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if forged
    claims: dict[str, Any] = json.loads(unb64url(body))
    assert claims["aud"] == audience and claims["sub"] == SUBJECT
    assert NOW_MS // 1000 < claims["exp"] <= NOW_MS // 1000 + 24 * 3600
    return claims


def outgoing(subscriptions: list[Any], **overrides: Any) -> Outgoing:
    message = Outgoing(
        id=1,
        key="msg_trial-ends_u1_3_push",
        channel="push",
        workspace=1,
        trigger="trial-ends",
        subject="u1",
        scope="user",
        title="Your trial ends in 3 days",
        text="Export your reports before Friday.",
        data={"subscriptions": subscriptions, "url": "https://app.example.com/billing"},
    )
    return msgspec.structs.replace(message, **overrides)


def channel(**options: Any) -> PushChannel:
    options.setdefault("allow_private", True)
    return PushChannel(VAPID_PRIVATE, SUBJECT, now_ms=lambda: NOW_MS, **options)


def send(push: PushChannel, *messages: Outgoing) -> list[Outcome]:
    async def go() -> list[Outcome]:
        try:
            return [await push.send(m) for m in messages]
        finally:
            await push.aclose()

    return asyncio.run(go())


def test_the_channel_implements_the_protocol():
    push: Channel = channel()
    assert push.name == "push" and not push.deduplicates
    asyncio.run(push.aclose())


def test_a_push_is_signed_for_its_origin_and_decrypts_in_the_browser():
    with receiver() as r:
        browser = Browser(r.url + "/push/abc")
        [outcome] = send(channel(), outgoing([browser.subscription]))
    assert isinstance(outcome, Sent)
    [seen] = r.seen
    assert seen.path == "/push/abc"
    verify_vapid(seen.headers["authorization"], audience=r.url)
    assert browser.decrypt(seen) == {
        "title": "Your trial ends in 3 days",
        "body": "Export your reports before Friday.",
        "url": "https://app.example.com/billing",
        "key": "msg_trial-ends_u1_3_push",
    }
    assert seen.headers["ttl"] == "86400"
    assert seen.headers["topic"] == topic("msg_trial-ends_u1_3_push")


def test_topic_is_stable_per_key_and_fits_the_header_rules():
    with receiver() as r:
        browser = Browser(r.url + "/push/abc")
        message = outgoing([browser.subscription])
        send(channel(ttl_s=600), message, message, outgoing([browser.subscription], key="other"))
    topics = [s.headers["topic"] for s in r.seen]
    assert topics[0] == topics[1] != topics[2]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,32}", t) for t in topics)
    assert {s.headers["ttl"] for s in r.seen} == {"600"}
    # encrypted afresh each time: a new ephemeral key and salt, the same message inside
    assert r.seen[0].body != r.seen[1].body
    assert browser.decrypt(r.seen[0]) == browser.decrypt(r.seen[1])


def test_one_gone_subscription_among_live_ones_is_still_sent():
    with receiver() as live, receiver(Answer(410)) as dead:
        subscriptions = [
            Browser(live.url + "/a").subscription,
            Browser(dead.url + "/b").subscription,
        ]
        [outcome] = send(channel(), outgoing(subscriptions))
    assert isinstance(outcome, Sent)
    assert "1 gone" in outcome.detail and "1 sent" in outcome.detail
    assert len(live.seen) == len(dead.seen) == 1


def test_every_subscription_gone_is_reported_with_the_endpoints():
    with receiver(Answer(410)) as first, receiver(Answer(404)) as second:
        a, b = first.url + "/a", second.url + "/b"
        [outcome] = send(channel(), outgoing([Browser(a).subscription, Browser(b).subscription]))
    assert isinstance(outcome, Gone)
    assert outcome.endpoints == (a, b)


def test_rate_limits_and_server_errors_are_retried():
    with receiver(Answer(429, {"Retry-After": "30"}), Answer(503)) as r:
        browser = Browser(r.url + "/a")
        limited, broken = send(
            channel(), outgoing([browser.subscription]), outgoing([browser.subscription])
        )
    assert isinstance(limited, Retry) and limited.after_ms == 30_000
    assert isinstance(broken, Retry) and broken.after_ms is None


def test_a_retry_wins_over_gone_when_nothing_was_accepted():
    with receiver(Answer(500)) as flaky, receiver(Answer(410)) as dead:
        subscriptions = [
            Browser(flaky.url + "/a").subscription,
            Browser(dead.url + "/b").subscription,
        ]
        [outcome] = send(channel(), outgoing(subscriptions))
    assert isinstance(outcome, Retry)


def test_other_refusals_fail():
    with receiver(Answer(403, body=b"VAPID key mismatch")) as r:
        [outcome] = send(channel(), outgoing([Browser(r.url + "/a").subscription]))
    assert isinstance(outcome, Failed) and "VAPID key mismatch" in outcome.detail


def test_push_endpoints_pass_the_ssrf_guard(monkeypatch):
    async def resolve(host: str, port: int) -> list[str]:
        return ["::ffff:10.0.0.1"] if host == "mapped.example" else await real_resolve(host, port)

    real_resolve = netguard.resolve
    monkeypatch.setattr(netguard, "resolve", resolve)
    with receiver() as r:
        port = r.url.rsplit(":", 1)[1]
        endpoints = [
            f"https://127.0.0.1:{port}/a",
            f"https://localhost:{port}/b",
            "https://mapped.example/c",
        ]
        subscriptions = [Browser(e).subscription for e in endpoints]
        [refused] = send(channel(allow_private=False), outgoing(subscriptions))
        assert r.seen == []
    assert isinstance(refused, Failed)
    assert refused.detail.count("FOREWARN_WEBHOOK_ALLOW_PRIVATE=1") == 3
    assert "127.0.0.1 is loopback" in refused.detail and "10.0.0.1 is private" in refused.detail
    plain = Browser("http://push.example.com/a")
    [insecure] = send(channel(allow_private=False), outgoing([plain.subscription]))
    assert isinstance(insecure, Failed) and "not https" in insecure.detail


def test_unusable_subscriptions_fail():
    broken = {"endpoint": "https://push.example.com/a", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}
    ip_literal = Browser("https://[2606:4700::1]/a").subscription
    messages = [outgoing([]), outgoing([broken]), outgoing(["junk"]), outgoing([ip_literal])]
    [none, bad, junk, literal] = send(channel(), *messages)
    assert isinstance(none, Failed) and "no push subscriptions" in none.detail
    assert isinstance(bad, Failed) and "unusable subscription" in bad.detail
    assert isinstance(junk, Failed)
    assert (
        isinstance(literal, Failed) and "cannot sign for https://[2606:4700::1]" in literal.detail
    )


def test_a_long_body_is_shortened_to_fit_and_an_oversized_title_fails():
    message = outgoing([], text="é" * 5000)
    raw = push_payload(message)
    assert raw is not None and len(raw) <= MAX_PAYLOAD_BYTES
    doc = json.loads(raw)
    assert doc["body"].endswith("…") and doc["body"].startswith("éé")
    assert push_payload(outgoing([], title="t" * MAX_PAYLOAD_BYTES)) is None
    [outcome] = send(channel(), outgoing([{}], title="t" * MAX_PAYLOAD_BYTES))
    assert isinstance(outcome, Failed) and "do not fit" in outcome.detail


def test_generated_vapid_keys_are_a_p256_pair():
    private, public = generate_vapid_keys()
    assert len(unb64url(private)) == 32
    assert len(unb64url(public)) == 65 and unb64url(public)[0] == 4
    push = PushChannel(private, SUBJECT)
    assert push.public_key == public
    asyncio.run(push.aclose())


def test_bad_vapid_settings_are_explained():
    with pytest.raises(InputError, match="FOREWARN_VAPID_PRIVATE_KEY"):
        PushChannel("not a key", SUBJECT)
    with pytest.raises(InputError, match="FOREWARN_VAPID_SUBJECT"):
        PushChannel(VAPID_PRIVATE, "support@example.com")
