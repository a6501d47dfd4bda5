"""The webhook channel: one signed HTTP POST per message, in the Standard Webhooks format
(https://www.standardwebhooks.com) or as a Slack incoming-webhook message. Edge.

    message ─▶ target URL (to > settings.url > default) ─▶ body (standard | slack)
            ─▶ sign (webhook-id = message.key) ─▶ POST through the SSRF guard ─▶ Outcome

Also the retry back-off every channel's delivery worker uses (`retry_delay_ms`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec

from forewarn import clock
from forewarn.channels import Failed, Gone, Outcome, Outgoing, Retry, Sent
from forewarn.errors import InputError
from forewarn.ingest import iso
from forewarn.netguard import RefusedTarget, check_scheme, guarded_client

EVENT_TYPE = "outreach.created"
FORMATS = ("standard", "slack")
SECRET_PREFIX = "whsec_"
DETAIL_BYTES = 300  # how much of a peer's answer goes into an outcome's detail
USER_AGENT = "Forewarn-Webhook/1"

# --- back-off -----------------------------------------------------------------------------------

BACKOFF_BASE_MS = 30_000  # the ceiling after the first failed attempt
BACKOFF_CAP_MS = 6 * 3_600_000  # the ceiling never grows past 6 hours


def retry_delay_ms(attempt: int, rng: random.Random) -> int:
    """How long to wait after failed attempt number `attempt` (1 = the first try): exponential
    back-off with full jitter, a uniform draw in [0, ceiling) where the ceiling is 30 s, 1 m,
    2 m, 4 m, ... doubling per attempt up to 6 h (from attempt 11 on). Full jitter spreads the
    retries of many messages that failed together. The worker waits at least `Retry.after_ms`
    when the peer asked for that."""
    doublings = min(max(attempt, 1) - 1, 32)
    ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS << doublings)
    return int(rng.random() * ceiling)


def retry_after_ms(value: str | None, now_ms: int) -> int | None:
    """A Retry-After header (delay seconds or an HTTP date) in milliseconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0, int(when.timestamp() * 1000) - now_ms)


# --- signing (Standard Webhooks) ----------------------------------------------------------------


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret; InputError if it is not one."""
    text = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise InputError(
            "the webhook secret must be 'whsec_' followed by base64 (e.g. "
            "'whsec_' + base64 of 32 random bytes); check FOREWARN_WEBHOOK_SECRET or the "
            "trigger's secret"
        )
    return key


def sign(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The `webhook-signature` value: v1, then base64 HMAC-SHA256 of "id.timestamp.body"."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- bodies -------------------------------------------------------------------------------------


def standard_body(message: Outgoing, now_ms: int) -> dict[str, Any]:
    """The Standard Webhooks body. Render it when the message is decided and pass it as
    `data["payload"]` so every retry sends the same bytes (else `now_ms` is the send time)."""
    return {
        "type": EVENT_TYPE,
        "timestamp": iso(now_ms),
        "data": {
            "trigger": message.trigger,
            "subject": message.subject,
            "scope": message.scope,
            "title": message.title,
            "text": message.text,
            "evidence": message.data.get("evidence", {}),
            "traits": message.data.get("traits", {}),
        },
    }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(message: Outgoing) -> dict[str, Any]:
    """A Slack incoming-webhook message: a header, the text, and which trigger and subject."""
    blocks: list[dict[str, Any]] = []
    if message.title:
        header = {"type": "plain_text", "text": message.title[:150]}
        blocks.append({"type": "header", "text": header})
    if message.text:
        section = {"type": "mrkdwn", "text": _slack_escape(message.text)[:3000]}
        blocks.append({"type": "section", "text": section})
    about = {
        "type": "mrkdwn",
        "text": _slack_escape(f"`{message.trigger}` · {message.scope} {message.subject}"),
    }
    blocks.append({"type": "context", "elements": [about]})
    fallback = "\n".join(part for part in (message.title, message.text) if part)
    return {"text": fallback or message.trigger, "blocks": blocks}


# --- outcomes -----------------------------------------------------------------------------------


def _origin(url: str) -> str:
    """Where a URL points, without its path: Slack webhook paths are secrets, and details are
    kept in the event log."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"


def classify(status: int, headers: httpx.Headers, answer: str, url: str, now_ms: int) -> Outcome:
    """What an HTTP answer means for the message."""
    detail = f"{_origin(url)} answered {status}" + (f": {answer}" if answer else "")
    if 200 <= status < 300:
        return Sent(detail)
    if status == 410:
        return Gone(detail, endpoints=(url,))
    if status in (408, 429) or status >= 500:
        return Retry(detail, after_ms=retry_after_ms(headers.get("retry-after"), now_ms))
    if 300 <= status < 400:
        return Failed(f"{detail}; redirects are not followed, set the final URL instead")
    return Failed(detail)


class WebhookChannel:
    """POSTs each message to a webhook URL. Pass `client` only from `netguard.guarded_client`
    (anything else skips the SSRF guard); a client passed in is not closed by `aclose`."""

    name = "webhook"
    deduplicates = True  # receivers drop a second webhook-id

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        allow_private: bool = False,
        timeout_s: float = 10,
        client: httpx.AsyncClient | None = None,
        now_ms: Callable[[], int] = clock.now_ms,
    ) -> None:
        if secret:
            decode_secret(secret)  # a bad server-wide secret is a startup error
        self.url = url
        self.secret = secret
        self.now_ms = now_ms
        self.owns_client = client is None
        self.client = client or guarded_client(allow_private, timeout_s)

    async def send(self, message: Outgoing) -> Outcome:
        url = message.to or message.settings.get("url") or self.url
        if not url:
            return Failed("no webhook URL: set FOREWARN_WEBHOOK_URL or the trigger's url")
        try:
            host = check_scheme(url).host
            request = self._request(message, url, host)
        except (RefusedTarget, InputError) as e:
            return Failed(e.message)
        except (TypeError, msgspec.EncodeError) as e:
            return Failed(f"the webhook body cannot be written as JSON: {e}")
        try:
            async with self.client.stream("POST", url, **request) as response:
                answer = await read_some(response)
        except RefusedTarget as e:
            return Failed(e.message)
        except httpx.TimeoutException:
            return Retry(f"{_origin(url)} timed out")
        except httpx.TransportError as e:
            return Retry(f"{_origin(url)}: {type(e).__name__}: {e}")
        return classify(response.status_code, response.headers, answer, url, self.now_ms())

    def _request(self, message: Outgoing, url: str, host: str) -> dict[str, Any]:
        now_ms = self.now_ms()
        kind = message.settings.get("format") or ("slack" if host == "hooks.slack.com" else "")
        kind = kind or "standard"
        if kind not in FORMATS:
            raise InputError(f"unknown webhook format {kind!r}; use one of {', '.join(FORMATS)}")
        if kind == "slack":
            body = msgspec.json.encode(slack_body(message))
        else:
            payload = message.data.get("payload") or standard_body(message, now_ms)
            body = msgspec.json.encode(payload)
        timestamp_s = now_ms // 1000
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message.key,
            "webhook-timestamp": str(timestamp_s),
        }
        secret = message.settings.get("secret") or self.secret
        if secret:
            key = decode_secret(secret)
            headers["webhook-signature"] = sign(key, message.key, timestamp_s, body)
        elif kind == "standard":
            raise InputError(
                "no webhook secret: set FOREWARN_WEBHOOK_SECRET or the trigger's secret "
                "(Standard Webhooks are always signed)"
            )
        return {"content": body, "headers": headers}

    async def aclose(self) -> None:
        if self.owns_client:
            await self.client.aclose()


async def read_some(response: httpx.Response) -> str:
    """The start of the answer, for the outcome's detail; the rest is not read."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= DETAIL_BYTES:
                break
    except httpx.DecodingError:  # a garbled answer is still an answer; its status counts
        pass
    text = b"".join(chunks)[:DETAIL_BYTES].decode("utf-8", "replace")
    return " ".join(text.split())
