"""The push channel: Web Push (RFC 8030) to every browser subscription of the subject, signed
with VAPID (RFC 8292) and encrypted with aes128gcm (RFC 8291). Edge.

    message ─▶ payload {title, body, url?, key} ─▶ per subscription: encrypt, sign for its
            origin, POST through the SSRF guard ─▶ one Outcome for the message

pywebpush does the encryption and py_vapid the VAPID token; the request itself goes through our
own httpx client rather than pywebpush's requests/aiohttp sessions, so it is async without a
thread per send and passes the SSRF guard with its DNS-rebinding defence, like webhooks.

Several subscriptions, one outcome: `Sent` if any push service accepted the message (the detail
counts the subscriptions that are gone; `Sent` cannot carry them); else `Retry` if any failure
may pass; else `Gone` listing the subscriptions that are gone (404/410) if there are any; else
`Failed`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Callable
from typing import Any, Literal

import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException
from pywebpush import WebPusher, WebPushException

from forewarn import clock
from forewarn.channel_webhook import read_some, retry_after_ms
from forewarn.channels import Failed, Gone, Outcome, Outgoing, Retry, Sent
from forewarn.errors import InputError
from forewarn.netguard import RefusedTarget, check_scheme, guarded_client

# what fits one aes128gcm record of the 4096 bytes push services accept, with room to spare
MAX_PAYLOAD_BYTES = 3800
DEFAULT_TTL_S = 86_400  # a push service keeps an undelivered message for a day
JWT_LIFETIME_MS = 12 * 3_600_000  # RFC 8292 allows at most 24 hours


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_vapid_keys() -> tuple[str, str]:
    """A new VAPID key pair as base64url: the raw 32-byte private key (server secret) and the
    uncompressed public point (the browser's `applicationServerKey`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_numbers().private_value.to_bytes(32, "big")
    public = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _b64url(private), _b64url(public)


def topic(key: str) -> str:
    """The Topic header for a message: a resend replaces a copy the push service still holds.
    At most 32 characters of the base64url alphabet (RFC 8030)."""
    return _b64url(hashlib.sha256(key.encode()).digest())[:32]


def push_payload(message: Outgoing) -> bytes | None:
    """The JSON the service worker receives, the body shortened to fit a push message; None if
    even the title and URL do not fit."""
    doc: dict[str, str] = {"title": message.title, "body": message.text, "key": message.key}
    url = message.data.get("url")
    if isinstance(url, str) and url:
        doc["url"] = url
    raw = msgspec.json.encode(doc)
    while len(raw) > MAX_PAYLOAD_BYTES and doc["body"]:
        body = doc["body"].encode()
        keep = len(body) - (len(raw) - MAX_PAYLOAD_BYTES) - 3  # 3: the ellipsis
        doc["body"] = body[:keep].decode("utf-8", "ignore") + "…" if keep > 0 else ""
        raw = msgspec.json.encode(doc)
    return raw if len(raw) <= MAX_PAYLOAD_BYTES else None


class _Result(msgspec.Struct, frozen=True):
    kind: Literal["sent", "gone", "retry", "failed"]
    endpoint: str
    detail: str
    after_ms: int | None = None


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


class PushChannel:
    """Sends each message to the subject's push subscriptions (`data["subscriptions"]`)."""

    name = "push"
    deduplicates = False  # the service worker can use `key` as the notification tag

    def __init__(
        self,
        vapid_private_key: str,
        vapid_subject: str,
        *,
        allow_private: bool = False,
        timeout_s: float = 10,
        ttl_s: int = DEFAULT_TTL_S,
        client: httpx.AsyncClient | None = None,
        now_ms: Callable[[], int] = clock.now_ms,
    ) -> None:
        try:
            self.vapid = Vapid02.from_string(vapid_private_key)
        except (VapidException, ValueError, TypeError, binascii.Error):
            raise InputError(
                "the VAPID private key is not a base64url P-256 key; make one with "
                "generate_vapid_keys and set FOREWARN_VAPID_PRIVATE_KEY"
            ) from None
        if not vapid_subject.startswith(("mailto:", "https://")):
            raise InputError(
                f"the VAPID subject must be a mailto: or https: URL, not {vapid_subject!r}; "
                "set FOREWARN_VAPID_SUBJECT (push services contact it about problems)"
            )
        public = self.vapid.public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public_key = _b64url(public)  # what the browser must subscribe with
        self.subject = vapid_subject
        self.allow_private = allow_private
        self.ttl_s = ttl_s
        self.now_ms = now_ms
        self.owns_client = client is None
        self.client = client or guarded_client(allow_private, timeout_s)

    async def send(self, message: Outgoing) -> Outcome:
        subscriptions = message.data.get("subscriptions") or []
        if not isinstance(subscriptions, list) or not subscriptions:
            return Failed("no push subscriptions for this subject")
        payload = push_payload(message)
        if payload is None:
            return Failed(f"the title and url do not fit a push message ({MAX_PAYLOAD_BYTES} B)")
        results = await asyncio.gather(
            *(self._push(sub, payload, message.key) for sub in subscriptions)
        )
        return _combine(list(results))

    async def _push(self, sub: Any, payload: bytes, key: str) -> _Result:
        endpoint = str(sub.get("endpoint", "")) if isinstance(sub, dict) else ""
        try:
            url = check_scheme(endpoint)
            if url.scheme != "https" and not self.allow_private:
                raise RefusedTarget(f"refused push endpoint {_origin(url)}: not https")
            body = WebPusher(sub).encode(payload, "aes128gcm")["body"]
        except RefusedTarget as e:
            return _Result("failed", endpoint, e.message)
        except (WebPushException, ValueError, TypeError, KeyError, binascii.Error) as e:
            return _Result("failed", endpoint, f"an unusable subscription: {e}")
        exp_s = (self.now_ms() + JWT_LIFETIME_MS) // 1000
        claims: dict[str, str | int] = {"aud": _origin(url), "sub": self.subject, "exp": exp_s}
        try:
            vapid = self.vapid.sign(claims)
        except VapidException as e:  # e.g. an IP-literal endpoint, which no push service has
            return _Result("failed", endpoint, f"cannot sign for {_origin(url)}: {e}")
        headers = {
            **vapid,
            "ttl": str(self.ttl_s),
            "topic": topic(key),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
        }
        where = _origin(url)
        try:
            async with self.client.stream("POST", url, content=body, headers=headers) as response:
                answer = await read_some(response)
        except RefusedTarget as e:
            return _Result("failed", endpoint, e.message)
        except httpx.TimeoutException:
            return _Result("retry", endpoint, f"{where} timed out")
        except httpx.TransportError as e:
            return _Result("retry", endpoint, f"{where}: {type(e).__name__}: {e}")
        status = response.status_code
        detail = f"{where} answered {status}"
        if 200 <= status < 300:
            return _Result("sent", endpoint, detail)
        if status in (404, 410):
            return _Result("gone", endpoint, detail)
        if status in (408, 429) or status >= 500:
            after = retry_after_ms(response.headers.get("retry-after"), self.now_ms())
            return _Result("retry", endpoint, detail, after)
        return _Result("failed", endpoint, f"{detail}: {answer}")

    async def aclose(self) -> None:
        if self.owns_client:
            await self.client.aclose()


def _combine(results: list[_Result]) -> Outcome:
    by_kind: dict[str, list[_Result]] = {}
    for r in results:
        by_kind.setdefault(r.kind, []).append(r)
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    details = "; ".join(r.detail for r in results)
    gone = tuple(r.endpoint for r in by_kind.get("gone", ()))
    summary = f"{counts} of {len(results)} subscriptions: {details}"
    if "sent" in by_kind:
        return Sent(summary, endpoints=gone)
    if "retry" in by_kind:
        afters = [r.after_ms for r in by_kind["retry"] if r.after_ms is not None]
        return Retry(summary, after_ms=max(afters) if afters else None)
    if gone:
        return Gone(summary, endpoints=gone)
    return Failed(summary)
